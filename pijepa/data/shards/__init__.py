"""`pijepa shards write`: pack an image-classification dataset into shuffled WebDataset shards.

Sources (one or more ``--src``; the layout is detected per source):

* **per-class tars** -- ``SRC/<class>.tar`` holding flat image files, as in the official
  ImageNet-21K/22K release (``n01440764.tar`` -> ``n01440764_10026.JPEG`` ...);
* **ImageFolder** -- ``SRC/<class>/<file>.jpg`` (files may sit in nested folders).

With several sources (e.g. split folders) the classes are the sorted union of all class names, so
the same classes always get the same ids ``0..C-1``. Class folders/tars count as classes even when
they hold no image. Names starting with ``.`` (``.DS_Store``, ``.ipynb_checkpoints``, macOS ``._x``
AppleDouble members) are tool metadata and are ignored everywhere; every other file that does not
become a sample is listed in ``skipped.json``.

Output in ``OUT``:

* ``{prefix}-{index:06d}.tar`` -- samples of a single global permutation of all images
  (``numpy.random.default_rng(seed).permutation``), each with the keys of the public ImageNet-22K
  WebDataset shards: ``__key__`` (from the file name, ``[A-Za-z0-9_-]`` only, unique), ``cls``
  (class id as ASCII), ``jpg`` and ``json`` (``{"class_id", "class_name", "file", "source"}``, where
  ``file`` is the tar member name or the path below the class folder and ``source`` is
  ``<src folder>/<class>.tar`` or ``<src folder>/<class>``).
* ``shards.json`` -- the index (format ``pijepa-shards-v1``), written atomically at the very end:
  its presence means the conversion is complete. Read it with :func:`read_index`.
* ``skipped.json`` -- ``[{"file", "source", "class_name", "reason"}]`` for every file left out;
  ``transcoded.json`` -- the same for non-JPEG images that were converted (see below).
* ``plan.json`` and ``parts/<shard>.json`` -- resume bookkeeping (settings, listing fingerprint,
  per-shard digests; per-shard result records).

Image policy (what an ImageNet user expects; it is also what the widely used TF ImageNet build
script does with the one PNG and the CMYK JPEGs hidden among ImageNet's ``.JPEG`` files):

* every image is fully decoded with PIL before it is written; undecodable files (truncated JPEGs,
  text named ``.jpg``, ...) are skipped, listed in ``skipped.json`` and counted in the index;
* without ``reencode``, JPEG files (any colour mode, CMYK and greyscale included) keep their
  original bytes under ``jpg`` -- loaders must ``convert("RGB")``, as torchvision's ImageFolder
  loader does; other formats (PNG disguised as ``.JPEG``, BMP, WebP, ...) are the rare exception:
  they are converted to RGB JPEG (quality 95) so that every sample has a JPEG under ``jpg`` (keys
  such as ``png`` would break loaders that select ``jpg``), and listed in ``transcoded.json``;
* with ``reencode=True`` every image is decoded and re-encoded as RGB JPEG (quality 95): CMYK,
  greyscale and palette images are converted, alpha is composited onto white. EXIF orientation is
  not applied (pixels stay as PIL/torchvision loaders see them in the original file).

Determinism: shard boundaries are planned from file sizes before anything is written (a count per
shard with ``samples_per_shard``, else greedily up to ``max_shard_bytes`` from the exact tar sizes
of the original bytes; re-encoding or skipped files make a shard a little smaller), so the shards
are written in parallel, each whole by one worker, and the result does not depend on ``workers``.
The shards are written with webdataset's ``TarWriter`` (one per shard: ``ShardWriter`` decides
boundaries itself, sequentially, and writes the final names directly), which is reproducible once
``mtime`` is fixed: it sorts each sample's keys, writes tarfile's default POSIX (pax) headers with
uid/gid 0 (its ``format`` argument is not passed on to tarfile) and takes mode and user/group names
from its arguments -- all fixed in ``writer``. Reruns are byte-identical.

Resume: each shard is written to ``name.tar.tmp`` then renamed, and its record goes to
``parts/``. A rerun with the same settings and unchanged sources skips shards whose file and record
agree (digest, size and sample count); a rerun with other settings is refused.

Modules: ``sources`` (finding the images), ``plan`` (keys, exact sizes, shard boundaries, resume
check), ``writer`` (writing shards, records and the index), ``index`` (file names, reading
``shards.json``); the image checks and conversions are in :mod:`pijepa.data.images`.
"""

from pijepa.data.shards.index import INDEX_FORMAT, INDEX_NAME, ShardsError, read_index, shard_paths
from pijepa.data.shards.sources import LAYOUTS, Entry, detect_layout, scan_container
from pijepa.data.shards.writer import write_shards

__all__ = ["INDEX_FORMAT", "INDEX_NAME", "LAYOUTS", "Entry", "ShardsError", "detect_layout", "read_index",
           "scan_container", "shard_paths", "write_shards"]
