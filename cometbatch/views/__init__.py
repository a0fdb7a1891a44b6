"""What an output folder holds, shown: status, export and the gallery."""
