"""Image-classification pretrain/fine-tune pipeline: the library behind steps/.

Importing this package does nothing but define things: no I/O, no downloads.
"""
