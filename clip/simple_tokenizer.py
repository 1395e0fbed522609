"""CLIP's byte-level BPE tokenizer (lower-cased, ftfy-cleaned, 49,408 ids).

Ids 0..255 are the bytes, 256..511 the bytes with an end-of-word marker, then one id per merge
rule of the vocabulary file, then <|startoftext|> (49406) and <|endoftext|> (49407).
"""
import functools
import gzip
import html
import os

DEFAULT_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # merge rules used by CLIP; the file holds a few more
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Special tokens, English contractions, runs of letters, single digits, runs of other symbols.
TOKEN_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                 r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")


def _text_libraries():
    """ftfy and regex, imported on first use so that `import clip` works without them."""
    try:
        import ftfy
        import regex
    except ImportError as err:
        raise ImportError(f"the CLIP tokenizer needs the packages ftfy and regex (pip install ftfy regex): {err}") \
            from err
    return ftfy, regex


@functools.lru_cache()
def byte_to_char():
    """A reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes stand for themselves; the others (control chars, space, ...) are
    shifted to code points from 256 upward, in byte order, so that BPE never sees whitespace.
    The dict's order is the vocabulary order: the printable bytes first, then the shifted ones.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(others)})
    return mapping


def clean_text(text):
    """ftfy repair, double HTML unescape, whitespace collapse, lower case."""
    ftfy, re = _text_libraries()
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = re.sub(r"\s+", " ", text).strip()
    return text.lower()


class SimpleTokenizer:
    def __init__(self, bpe_path=DEFAULT_BPE_PATH):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]  # line 0 is a version header
        self.byte_encoder = byte_to_char()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}

        byte_chars = list(self.byte_encoder.values())
        vocab = byte_chars + [c + END_OF_WORD for c in byte_chars]
        vocab += ["".join(pair) for pair in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.cache = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        _, regex = _text_libraries()
        self.pattern = regex.compile(TOKEN_PATTERN, regex.IGNORECASE)
        self.sot_id = self.encoder[SOT_TOKEN]
        self.eot_id = self.encoder[EOT_TOKEN]

    @property
    def vocab_size(self):
        return len(self.encoder)

    def bpe(self, word):
        """Apply merge rules to one pre-token; returns its BPE symbols joined by spaces."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = list(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.merge_rank.get(pair, float("inf")))
            if best not in self.merge_rank:
                break
            merged = []
            i = 0
            while i < len(symbols):  # merge every left-to-right occurrence of the best pair
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        result = " ".join(symbols)
        self.cache[word] = result
        return result

    def encode(self, text):
        ids = []
        for piece in self.pattern.findall(clean_text(text)):
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(chars).split(" "))
        return ids

    def decode(self, ids):
        """Inverse of encode, up to the cleaning (case, whitespace); word ends become spaces."""
        text = "".join(self.decoder[int(i)] for i in ids)
        words = [bytearray(self.byte_decoder[c] for c in word).decode("utf-8", errors="replace")
                 for word in text.split(END_OF_WORD)]
        return " ".join(words).strip()
