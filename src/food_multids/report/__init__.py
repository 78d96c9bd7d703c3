"""The training report: HTML (inline figures) and Markdown, built from the catalog's outputs."""
