"""Training data: url lists, the emoji demo corpus, download, shard canonicalisation and the loader."""

# Member extensions read as an image in a webdataset shard, in order of preference: a sample's image
# is its first member with one of these (training shards from img2dataset, held-out and DataComp
# eval sets alike).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
