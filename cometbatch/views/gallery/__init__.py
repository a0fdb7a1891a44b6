"""The gallery: an output folder as one self-contained HTML page."""
