"""Where frames come from: one `Source` interface for the simulator, video, DICOM and OpenIGTLink."""
from devices.base import (
    CorruptData,
    Disconnected,
    EndOfStream,
    Frame,
    InvalidFrame,
    Source,
    SourceError,
    SourceNotFound,
    UnsupportedFormat,
    create_source,
    register_source,
    source_schemes,
    to_gray_uint8,
)

__all__ = [
    "CorruptData", "Disconnected", "EndOfStream", "Frame", "InvalidFrame", "Source", "SourceError",
    "SourceNotFound", "UnsupportedFormat", "create_source", "register_source", "source_schemes",
    "to_gray_uint8",
]
