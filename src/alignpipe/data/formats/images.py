"""Images of TRL's vision formats: an ``images`` list per record (or one ``image``), and
``{"type": "image"}`` placeholder parts in the conversation.

An image is a path (relative to the data file's folder, or absolute), embedded bytes, a
``{"bytes": ..., "path": ...}`` record (how ``datasets`` stores an ``Image`` feature in parquet) or a
PIL image (an ``hf:`` dataset with decoded images). Each is read and decoded now, so a missing or
corrupt image fails (or, with ``on_invalid: drop``, is counted) at its row. Rows keep the image's
original bytes (encoded images, not pixels) and its path, the layout of a ``datasets`` ``Image``.

Placement: TRL's convention (``trl.data_utils.prepare_multimodal_messages``): the images come before
the text of the first user message. Placeholder parts elsewhere (a later turn, after text, in an
answer) are refused for now; a record without placeholders gets its images in that place.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from alignpipe.data.errors import DataError, type_name
from alignpipe.data.formats.messages import Row

# Conversation fields of TRL's records whose messages may hold image parts.
_FIELDS = ("messages", "prompt", "chosen", "rejected", "completion")
# Keys of an image part that carry the image itself (unsupported: the images come in the row's list).
_PAYLOADS = ("image", "url", "path", "image_url")


def _is_image_part(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type") == "image"


def _strip_field(messages: list[Any], field: str) -> tuple[list[Any], int]:
    """``messages`` without their image parts, and how many there were; placement as the module says."""
    out, count, first_user = [], 0, True
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if not isinstance(content, list) or not any(_is_image_part(p) for p in content):
            first_user = first_user and not (isinstance(msg, Mapping) and msg.get("role") == "user")
            out.append(msg)
            continue
        leading = next((j for j, p in enumerate(content) if not _is_image_part(p)), len(content))
        if not first_user or msg.get("role") != "user" or any(_is_image_part(p) for p in content[leading:]):
            raise DataError(
                f"message {i}: image parts are supported only before the text of the first user message "
                "(TRL's placement)",
                field=field,
                reason="image_placement",
            )
        if any(p.get(key) is not None for p in content[:leading] for key in _PAYLOADS):
            raise DataError(
                f"message {i}: an image part carries its own payload; give the images in the row's "
                "'images' list and {'type': 'image'} placeholders in the messages",
                field=field,
                reason="image_placement",
            )
        first_user, count = False, leading
        out.append({**msg, "content": content[leading:]})
    return out, count


def strip_image_parts(record: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """``record`` with the image placeholders taken out of its messages, and their number per side
    (a prompt's, or each of an implicit-prompt pair's conversations, which must agree)."""
    stripped, counts = dict(record), {}
    for field in _FIELDS:
        value = record.get(field)
        if isinstance(value, list):
            stripped[field], counts[field] = _strip_field(value, field)
    found = {n for n in counts.values() if n}
    if len(found) > 1:
        raise DataError(
            f"the conversations hold different numbers of image parts ({counts})",
            field="images",
            reason="image_count",
        )
    return stripped, found.pop() if found else 0


def decode_check(data: bytes, what: str) -> None:
    """Decode ``data`` fully with PIL (a truncated file fails here, not in training)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{what}: not a readable image ({exc})", field="images", reason="bad_image") from None


def load_image(value: Any, base_dir: Path | None, what: str) -> dict[str, Any]:
    """``{"bytes", "path"}`` of one image value (see the module doc), decoded once to check it."""
    path = None
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        data, path = value.get("bytes"), value.get("path")
        value = path if data is None and path is not None else data  # a path-only record: read the file
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image (decoded hf: datasets)
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        value = buffer.getvalue()
    if isinstance(value, str):
        file = Path(value).expanduser()
        file = file if file.is_absolute() or base_dir is None else base_dir / file
        if not file.is_file():
            raise DataError(f"{what}: file not found: {value}", field="images", reason="missing_image")
        path, value = value, file.read_bytes()
    if not isinstance(value, bytes | bytearray):
        raise DataError(
            f"{what}: expected a path, bytes or {{'bytes', 'path'}}, got {type_name(value)}",
            field="images",
            reason="wrong_type",
        )
    decode_check(bytes(value), what)
    return {"bytes": bytes(value), "path": path}


def with_images(
    to_rows: Callable[[Mapping[str, Any]], list[Row]], base_dir: Path | None
) -> Callable[[Mapping[str, Any]], list[Row]]:
    """A record converter whose rows also get the record's images in ``row["images"]`` (only when it has
    any: text rows stay as they are)."""

    def convert(record: Mapping[str, Any]) -> list[Row]:
        images = record.get("images", [record["image"]] if record.get("image") is not None else None)
        if images is None:  # a text record: read exactly as before (an image part there is refused as such)
            return to_rows(record)
        stripped, parts = strip_image_parts(record)
        if not isinstance(images, list):
            raise DataError(f"expected a list of images, got {type_name(images)}", field="images",
                            reason="wrong_type")  # fmt: skip
        if parts and parts != len(images):
            raise DataError(
                f"{parts} image part(s) in the messages but {len(images)} image(s)",
                field="images",
                reason="image_count",
            )
        rows = to_rows(stripped)
        loaded = [load_image(v, base_dir, f"image {i}") for i, v in enumerate(images)]
        return [{**row, "images": loaded} for row in rows] if loaded else rows

    return convert
