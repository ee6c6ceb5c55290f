from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EchoRequest(_message.Message):
    __slots__ = ("text", "delay_ms")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    text: str
    delay_ms: int
    def __init__(self, text: _Optional[str] = ..., delay_ms: _Optional[int] = ...) -> None: ...

class EchoReply(_message.Message):
    __slots__ = ("text", "instance", "served", "inflight")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    text: str
    instance: str
    served: int
    inflight: int
    def __init__(self, text: _Optional[str] = ..., instance: _Optional[str] = ..., served: _Optional[int] = ..., inflight: _Optional[int] = ...) -> None: ...

class CountRequest(_message.Message):
    __slots__ = ("n", "payload")
    N_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    n: int
    payload: bytes
    def __init__(self, n: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class SumReply(_message.Message):
    __slots__ = ("total", "messages", "instance")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    total: int
    messages: int
    instance: str
    def __init__(self, total: _Optional[int] = ..., messages: _Optional[int] = ..., instance: _Optional[str] = ...) -> None: ...
