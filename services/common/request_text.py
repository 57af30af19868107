"""Request strings must not hold NUL characters, on every database alike.

PostgreSQL text cannot store U+0000: the driver refuses it in an INSERT and in a WHERE
clause alike, so a NUL in a display name, a description or even a looked-up id ended as
INTERNAL there, while SQLite stored it silently (and `open()` refuses it in a path on both).
No name, id, label, location or description needs one, so the Registry's and the Trainer's
servicers refuse any request string that holds one, naming the field, before the domain
sees it.
This module reads protobuf messages generically and knows nothing about gRPC.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.common.errors import InvalidArgument


def _check_value(value: object, field: str) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidArgument(f"{field} contains a NUL character (\\x00), which no request text may hold",
                                  reason="NUL_CHARACTER", field=field)
    elif isinstance(value, Message):
        check_no_nul(value, f"{field}.")


def check_no_nul(message: Message, prefix: str = "") -> None:
    """INVALID_ARGUMENT naming the first string field (nested, repeated or map) that holds a NUL."""
    for descriptor, value in message.ListFields():
        field = prefix + descriptor.name
        if descriptor.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
            continue
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            for key, item in value.items():
                _check_value(key, f"{field} key")
                _check_value(item, f"{field}[{key!r}]")
        elif descriptor.is_repeated:
            for index, item in enumerate(value):
                _check_value(item, f"{field}[{index}]")
        else:
            _check_value(value, field)
