"""Output folders that one process writes and that appear whole or not at all.

    with outputs.OutputFolder(out_dir, overwrite=args.force, flag="--f_name") as out:
        out.check_space(expected_bytes)          # before the expensive work
        ...compute...
        with out.staged() as tmp:                # a new folder beside out_dir
            write everything into tmp
        # here tmp has replaced out_dir in one rename; the old folder is gone

- The lock (`<parent>/.<name>.lock`, an flock) is taken before anything else; a second process
  asking for the same folder is refused with one line and never touches it. The lock file is
  removed on release; an acquirer checks that the file it locked is still the one at the path.
- A staged folder is built as `<parent>/.<name>.tmp-<pid>`; on success the old folder (if any) is
  renamed to `.<name>.old-<pid>`, the new one into place, and the old one deleted. The swap and the
  clean-up run with Ctrl-C and SIGTERM held back until they are done. An error or interrupt while
  building leaves the old folder exactly as it was.
- Leftovers of a process that died (`.<name>.tmp-*`, `.<name>.old-*`) are cleaned up by the next
  holder of the lock: an `.old-*` folder whose final folder is missing (a crash between the two
  renames) is put back first.
- A full disk, a quota or a read-only file system while writing is an OutputWriteError: one line
  naming the path (utils.io's atomic writes raise it too).
"""
import errno
import fcntl
import os
import shutil
import signal
import threading
from contextlib import contextmanager

from .errors import OutputBusyError, OutputExistsError, OutputWriteError

# errno values that say "the output location cannot take this write" rather than "a bug"
WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}
SPACE_MARGIN_BYTES = 16 * 2 ** 20  # room kept free besides the estimate (logs, temporary files)


def write_error(err, path):
    """An OSError raised while writing `path` as an OutputWriteError (one line), or None when the
    error is not about the output location."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        return OutputWriteError(f"cannot write {path}: {WRITE_ERRNOS[err.errno]}; free some space or choose "
                                f"another output location (nothing half-written was left)")
    return None


@contextmanager
def output_errors(path):
    """Turn a full disk / read-only / permission error inside the block into an OutputWriteError."""
    try:
        yield
    except OSError as err:
        converted = write_error(err, path)
        if converted is None:
            raise
        raise converted from err


@contextmanager
def signals_deferred():
    """Hold back SIGINT and SIGTERM inside the block (a rename pair, a clean-up that must finish);
    a signal that arrived is delivered when the block ends. Only the main thread can do this; in
    other threads the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {sig: signal.signal(sig, lambda number, frame: caught.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for number in caught[:1]:
            signal.raise_signal(number)


def lock_path(folder):
    folder = os.path.abspath(folder)
    return os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.lock")


class FolderLock:
    """An exclusive, non-blocking lock on the output folder `folder` (which need not exist yet; its
    parent is created, and removed again on release if it is still empty, so that a refused or failed
    run leaves no empty folders). `what` names the writer in the refusal ("another training run")."""

    def __init__(self, folder, what="another process"):
        self.folder, self.path, self.what, self.fd = os.path.abspath(folder), lock_path(folder), what, None
        self.created = []

    def acquire(self):
        with output_errors(self.path):
            for attempt in range(1000):
                self.created += _make_folders(os.path.dirname(self.path))
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                except FileNotFoundError:
                    if not os.path.isdir(os.path.dirname(self.path)):
                        continue  # another holder removed the parent it had made: make it again
                    raise OutputWriteError(f"cannot create {self.path}: its folder takes no new files (a virtual "
                                           f"file system?); choose another output location") from None
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_pid(fd)
                    os.close(fd)
                    raise OutputBusyError(
                        f"{self.folder} is being written by {self.what}"
                        f"{f' (pid {holder})' if holder else ''}; wait for it to finish or choose another "
                        f"output folder (lock {self.path})") from None
                try:  # the holder before us may have removed the file after we opened it
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            else:
                raise OutputBusyError(f"{self.folder}: its lock {self.path} keeps being replaced by other processes; "
                                      f"try again or choose another output folder")
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        for folder in reversed(self.created):  # innermost first; one that is not empty stays
            try:
                os.rmdir(folder)
            except OSError:
                break
        self.created = []

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _make_folders(folder):
    """os.makedirs(folder); returns the folders it created, outermost first."""
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    made = []
    for path in reversed(missing):
        try:
            os.mkdir(path)
            made.append(path)
        except FileExistsError:
            pass
    return made


def _read_pid(fd):
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except (OSError, UnicodeDecodeError):
        return None


def free_bytes(path):
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def check_writable(folder, flag="the output folder"):
    """The nearest existing parent of `folder` must be a writable folder."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise OutputWriteError(f"{flag}: {path} is a file, not a folder; choose another output location")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputWriteError(f"{flag}: {path} is not writable; choose another output location or fix its "
                               f"permissions")


def check_space(folder, need_bytes, flag="the output folder"):
    """Refuse (one line) when the file system of `folder` has less than need_bytes + a margin free."""
    need = int(need_bytes) + SPACE_MARGIN_BYTES
    free = free_bytes(folder)
    if free < need:
        raise OutputWriteError(f"{flag}: {os.path.abspath(folder)} has {free / 2 ** 20:.0f} MiB free, this run "
                               f"needs about {need / 2 ** 20:.0f} MiB ({need_bytes / 2 ** 20:.1f} MiB of output and "
                               f"{SPACE_MARGIN_BYTES / 2 ** 20:.0f} MiB to spare); free some space or choose another "
                               f"output location")


def refuse_overlap(flag, folder, inputs, may_hold=()):
    """OutputExistsError when the output `folder` (given as `flag`) is, holds or lies inside one of
    `inputs` ({flag: path}): replacing it would replace what the script reads, --force or not. The
    flags in `may_hold` may hold the output folder (a run folder keeps its own evaluations)."""
    out = os.path.realpath(folder)
    for name, path in inputs.items():
        if not path:
            continue
        path = os.path.realpath(path)
        inside = out.startswith(path + os.sep) and name not in may_hold
        if out == path or inside or path.startswith(out + os.sep):
            raise OutputExistsError(f"{flag} {folder} overlaps {name} {inputs[name]}: writing there would replace "
                                    f"what it reads; choose a folder of its own")


class OutputFolder:
    """The output folder `folder` of one script run: locked on entry (OutputBusyError if another
    process holds it), stale leftovers of dead processes cleaned, existing results refused unless
    `overwrite` (OutputExistsError naming `flag`), the location checked writable. `staged()` builds
    the new contents and swaps them in whole. With `ours` (a test of a file name: does this script
    write it?) a folder that also holds other (not hidden) files is refused, flag or not: the swap would
    lose them."""

    def __init__(self, folder, overwrite=False, flag="--force", what="another process", exists=None, ours=None):
        self.folder = os.path.abspath(folder)
        self.overwrite, self.flag, self.ours = overwrite, flag, ours
        self.lock = FolderLock(self.folder, what)
        # exists(folder) -> True when the folder holds results a user would lose (default: any file in
        # it, or with `ours` any file of ours)
        self.exists = exists or (lambda path: any(ours is None or ours(n) for n in _entries(path)))

    def __enter__(self):
        check_writable(self.folder)
        self.lock.acquire()
        try:
            recover_leftovers(self.folder)
            if os.path.lexists(self.folder) and not os.path.isdir(self.folder):
                raise OutputExistsError(f"{self.folder} is a file, not a folder; choose another output folder")
            foreign = sorted(n for n in _entries(self.folder)  # hidden: temporary files of an interrupted write
                             if self.ours is not None and not self.ours(n) and not n.startswith("."))
            if foreign:
                raise OutputExistsError(f"{self.folder} holds files this program did not write ({', '.join(foreign[:3])}"
                                        f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty output folder")
            if self.exists(self.folder) and not self.overwrite:
                raise OutputExistsError(f"{self.folder} already holds results; pass {self.flag} to replace them "
                                        f"(they are kept until the new ones are complete)")
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc):
        self.lock.release()

    def check_space(self, need_bytes, flag="the output folder"):
        check_space(self.folder, need_bytes, flag)

    @contextmanager
    def staged(self):
        """Yield an empty temporary folder beside the output folder; when the block ends normally it
        replaces the output folder (see swap_in); on an error or interrupt it is removed and the
        output folder is left as it was."""
        tmp = staging_name(self.folder, "tmp")
        with output_errors(tmp):
            if os.path.lexists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        try:
            with output_errors(self.folder):
                yield tmp
        except OutputWriteError as err:  # name the output folder, not its temporary twin
            with signals_deferred():
                shutil.rmtree(tmp, ignore_errors=True)
            raise OutputWriteError(str(err).replace(tmp, self.folder)) from err
        except BaseException:
            with signals_deferred():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        swap_in(tmp, self.folder)


def _entries(folder):
    return os.listdir(folder) if os.path.isdir(folder) else []


def staging_name(folder, kind, pid=None):
    folder = os.path.abspath(folder)
    return os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.{kind}-{pid or os.getpid()}")


def swap_in(tmp, folder):
    """Replace `folder` (if any) by `tmp` with two renames and delete the old one, signals held back
    until all is done; a failure between the renames puts the old folder back."""
    old = staging_name(folder, "old")
    with signals_deferred():
        moved = False
        try:
            if os.path.lexists(folder):
                os.rename(folder, old)
                moved = True
            os.rename(tmp, folder)
        except BaseException as err:
            if moved:
                os.rename(old, folder)
            shutil.rmtree(tmp, ignore_errors=True)
            converted = write_error(err, folder)
            if converted is not None:
                raise converted from err
            raise
        if moved:
            shutil.rmtree(old, ignore_errors=True)


def recover_leftovers(folder):
    """Under the lock: remove `.<name>.tmp-*` and `.<name>.old-*` left by a process that died; an
    `.old-*` folder whose final folder is missing (a crash between the two renames) is put back."""
    folder = os.path.abspath(folder)
    parent, name = os.path.dirname(folder), os.path.basename(folder)
    if not os.path.isdir(parent):
        return
    for entry in sorted(os.listdir(parent)):
        for kind in ("old", "tmp"):
            prefix = f".{name}.{kind}-"
            if not entry.startswith(prefix) or not entry[len(prefix):].isdigit():
                continue
            path = os.path.join(parent, entry)
            with signals_deferred():
                if kind == "old" and not os.path.lexists(folder):
                    os.rename(path, folder)
                else:
                    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
