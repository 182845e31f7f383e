"""What crosses the wire: adapter message codecs per direction (see `codecs.py`)."""
