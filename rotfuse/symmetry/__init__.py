"""Pure tensor functions for the parameter symmetries: no files, no names, no CLI."""
