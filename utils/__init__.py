"""CLIP-FH's shared code, one module per concern (see README "Where things are"). Import the
module you need: `from utils import metrics`."""
