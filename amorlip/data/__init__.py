"""Training data: url lists, the emoji demo corpus, download, shard canonicalisation and the loader."""

# Member extensions read as an image in a webdataset shard, in order of preference: a sample's image
# is its first member with one of these (training shards from img2dataset, held-out and DataComp
# eval sets alike).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def count_tar_images(tar_path) -> int:
    """Image members of one webdataset tar (headers only; the data is skipped, not read).

    The one sample count of the project: the index's sizes.json (training shards) and the
    evaluation's set sizes (DataComp shards) both count with it.
    """
    import tarfile

    with tarfile.open(tar_path, "r") as tf:
        return sum(1 for m in tf if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
