"""A trained classifier on new images: one loaded model, one batched loop (shared with the full
evaluation), records from files, folders or HTTP requests, and the prediction table."""
