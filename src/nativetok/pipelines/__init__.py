"""Pipelines: commands that chain the layers below into outputs on disk. They run models over data
(tokenize, sample), train and then measure (compare, ablate), or turn a checkpoint into a shareable folder
(export); data/ only reads and writes, eval/ only measures."""
