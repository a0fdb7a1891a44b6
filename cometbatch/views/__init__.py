"""What an output folder holds, shown: status, export and the gallery."""

# The formats `export` writes; here, so that the command line lists them without loading export.
EXPORT_FORMATS = ("openai-batch", "csv", "jsonl")
