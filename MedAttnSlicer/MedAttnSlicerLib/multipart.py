# Copyright MedAttnSlicer contributors. Apache-2.0.
"""multipart/form-data encoding (requests) and parsing (MONAI Label's infer responses).

MONAI Label takes uploads as ``multipart/form-data`` (FastAPI ``Form``/``File`` fields) and answers
``POST /infer/{model}?output=all`` with a ``multipart/form-data`` body holding a ``params`` JSON part
and an ``image`` file part. Slicer ships no ``requests``, so both directions are done here with the
standard library only. Bodies are split by hand on the boundary (binary NIfTI parts must come back
byte for byte); part headers are parsed with the stdlib ``email`` header parser.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import email.utils
import mimetypes
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from .errors import ProtocolError

__all__ = [
    "MultipartPart",
    "encode_multipart_formdata",
    "parse_multipart",
    "parts_by_name",
    "content_type_param",
    "file_suffix",
]


@dataclass
class MultipartPart:
    """One part of a multipart body.

    Attributes:
        name: the form field name (``Content-Disposition: form-data; name=...``).
        filename: the file name for file parts, else None.
        content_type: the part's Content-Type, if given.
        data: the raw part content.
    """

    name: str
    filename: Optional[str]
    content_type: Optional[str]
    data: bytes

    def text(self, encoding: str = "utf-8") -> str:
        return self.data.decode(encoding)


FileField = Union[str, Tuple[str, bytes]]


def encode_multipart_formdata(
    fields: Mapping[str, str], files: Mapping[str, FileField], boundary: Optional[str] = None
) -> Tuple[str, bytes]:
    """Encode form fields and files as a ``multipart/form-data`` body.

    Args:
        fields: plain text fields, name -> value.
        files: file fields, name -> a file path, or (file name, content bytes).
        boundary: boundary to use (random when omitted); must not occur in the content.

    Returns:
        (Content-Type header value, body bytes).
    """
    boundary = boundary or f"medattn-{uuid.uuid4().hex}"
    marker = f"--{boundary}".encode("ascii")
    chunks: List[bytes] = []
    for name, value in fields.items():
        _check_header_value(name)
        chunks += [
            marker,
            f'Content-Disposition: form-data; name="{name}"'.encode(),
            b"",
            str(value).encode("utf-8"),
        ]
    for name, spec in files.items():
        _check_header_value(name)
        if isinstance(spec, (str, os.PathLike)):
            path = os.fspath(spec)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"File to upload for field '{name}' does not exist: {path}")
            filename = os.path.basename(path)
            with open(path, "rb") as handle:
                data = handle.read()
        else:
            filename, data = spec
            filename = os.path.basename(filename)
        _check_header_value(filename)
        if marker in data:
            raise ValueError(f"Multipart boundary '{boundary}' occurs inside the content of '{filename}'")
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        chunks += [
            marker,
            f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'.encode(),
            f"Content-Type: {content_type}".encode("ascii"),
            b"",
            data,
        ]
    chunks += [marker + b"--", b""]
    return f"multipart/form-data; boundary={boundary}", b"\r\n".join(chunks)


def content_type_param(content_type: str, param: str) -> Optional[str]:
    """Return a parameter (e.g. ``boundary``) of a Content-Type header value, unquoted."""
    message = email.message.Message()
    message["Content-Type"] = content_type
    value = message.get_param(param)
    if isinstance(value, tuple):  # RFC 2231 encoded value
        value = email.utils.collapse_rfc2231_value(value)
    return value


def parse_multipart(body: bytes, content_type: str) -> List[MultipartPart]:
    """Split a ``multipart/*`` body into its parts.

    Args:
        body: the whole response body.
        content_type: the response's Content-Type header (it carries the boundary).

    Raises:
        ProtocolError: when the header has no boundary or the body is not a well-formed multipart body.
    """
    if not content_type or not content_type.lower().startswith("multipart/"):
        raise ProtocolError(f"Expected a multipart response, got Content-Type '{content_type}'")
    boundary = content_type_param(content_type, "boundary")
    if not boundary:
        raise ProtocolError(f"Multipart Content-Type has no boundary: '{content_type}'")
    delimiter = b"--" + boundary.encode("latin-1")

    start = body.find(delimiter)
    if start < 0:
        raise ProtocolError("Multipart body does not contain its boundary")
    parts: List[MultipartPart] = []
    position = start + len(delimiter)
    header_parser = email.parser.BytesHeaderParser(policy=email.policy.HTTP)
    while True:
        if body[position : position + 2] == b"--":  # closing delimiter
            return parts
        if body[position : position + 2] != b"\r\n":
            raise ProtocolError("Malformed multipart body: boundary not followed by CRLF")
        position += 2
        # The next delimiter is always preceded by CRLF, which belongs to the delimiter, not the content.
        end = body.find(b"\r\n" + delimiter, position)
        if end < 0:
            raise ProtocolError("Malformed multipart body: missing closing boundary")
        raw_part = body[position:end]
        position = end + 2 + len(delimiter)
        header_end = raw_part.find(b"\r\n\r\n")
        if header_end < 0:
            raise ProtocolError("Malformed multipart part: no blank line after its headers")
        headers = header_parser.parsebytes(raw_part[: header_end + 4])
        data = raw_part[header_end + 4 :]
        disposition = headers.get("Content-Disposition", "")
        if not disposition:
            raise ProtocolError("Multipart part without Content-Disposition header")
        name = headers.get_param("name", header="content-disposition")
        filename = headers.get_filename()
        if isinstance(name, tuple):
            name = email.utils.collapse_rfc2231_value(name)
        parts.append(
            MultipartPart(
                name=str(name) if name is not None else "",
                filename=filename,
                content_type=headers.get("Content-Type"),
                data=data,
            )
        )


def parts_by_name(parts: List[MultipartPart]) -> Dict[str, MultipartPart]:
    """Index parts by field name (the last part wins when a name repeats)."""
    return {part.name: part for part in parts}


def file_suffix(filename: str) -> str:
    """The image suffix of a file name, keeping double suffixes such as ``.nii.gz`` and ``.seg.nrrd``."""
    name = os.path.basename(filename).lower()
    for double in (".nii.gz", ".seg.nrrd", ".tar.gz"):
        if name.endswith(double):
            return os.path.basename(filename)[-len(double) :]
    return os.path.splitext(os.path.basename(filename))[1]


def _check_header_value(value: str) -> None:
    if any(ch in value for ch in '"\r\n'):
        raise ValueError(f"Invalid character in multipart field or file name: {value!r}")
