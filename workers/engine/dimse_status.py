"""DIMSE statuses (PS3.7 Annex C, service-specific codes of PS3.4)."""

from __future__ import annotations

from enum import IntEnum

# --------------------------------------------------------------------------------------
# Statuses (PS3.7 Annex C, service-specific codes from PS3.4)
# --------------------------------------------------------------------------------------


class Status(IntEnum):
    """Common (0000,0900) Status values.

    General codes are PS3.7 C.4 and C.5; 0x0001 and the 0xA7xx/0xA9xx/0xBxxx/0xCxxx ones
    are the service-class codes of PS3.4 (C-STORE B.2.3, C-FIND/GET/MOVE C.4). The 0xC0xx-0xC5xx
    "handler" codes are the ones pynetdicom answers with when a user handler fails, kept
    identical so peers and logs see the same numbers.
    """

    SUCCESS = 0x0000
    # --- warning
    OPTIONAL_ATTRIBUTES_NOT_SUPPORTED = 0x0001
    ATTRIBUTE_LIST_ERROR = 0x0107
    ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    # --- failure, general (PS3.7 C.5)
    NO_SUCH_ATTRIBUTE = 0x0105
    INVALID_ATTRIBUTE_VALUE = 0x0106
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_SOP_INSTANCE = 0x0112
    NO_SUCH_EVENT_TYPE = 0x0113
    NO_SUCH_ARGUMENT = 0x0114
    INVALID_ARGUMENT_VALUE = 0x0115
    INVALID_OBJECT_INSTANCE = 0x0117
    NO_SUCH_SOP_CLASS = 0x0118
    CLASS_INSTANCE_CONFLICT = 0x0119
    MISSING_ATTRIBUTE = 0x0120
    MISSING_ATTRIBUTE_VALUE = 0x0121
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NO_SUCH_ACTION = 0x0123
    NOT_AUTHORIZED = 0x0124
    DUPLICATE_INVOCATION = 0x0210
    UNRECOGNIZED_OPERATION = 0x0211
    MISTYPED_ARGUMENT = 0x0212
    RESOURCE_LIMITATION = 0x0213
    # --- failure, service specific (PS3.4)
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_NUMBER_OF_MATCHES = 0xA701
    OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    # --- failure, handler problems (pynetdicom's numbers)
    HANDLER_STATUS_MISSING = 0xC001
    HANDLER_STATUS_INVALID = 0xC002
    STORE_DECODE_FAILED = 0xC210
    STORE_HANDLER_FAILED = 0xC211
    FIND_DECODE_FAILED = 0xC310
    FIND_HANDLER_FAILED = 0xC311
    GET_DECODE_FAILED = 0xC410
    GET_HANDLER_FAILED = 0xC411
    MOVE_DECODE_FAILED = 0xC510
    MOVE_HANDLER_FAILED = 0xC511
    # --- cancel, pending
    CANCEL = 0xFE00
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01


SUCCESS = "Success"
WARNING = "Warning"
FAILURE = "Failure"
CANCEL = "Cancel"
PENDING = "Pending"

# Warnings in the otherwise-failure 00xx/01xx range: the general ones of PS3.7 C.4
# (0107H, 0116H) and PS3.4's "requested optional attributes not supported" (0001H).
_WARNINGS_01XX = frozenset({0x0001, 0x0107, 0x0116})


def status_category(status: int) -> str:
    """The PS3.7 Annex C class of ``status``: Success, Warning, Failure, Cancel or Pending.

    0x0000 success; 0xFF00/0xFF01 pending; 0xFE00 cancel; 0x0001, 0x0107, 0x0116 and
    0xB000-0xBFFF warning; 0x01xx, 0x02xx, 0xA000-0xAFFF and 0xC000-0xCFFF failure.
    A code outside every range (pynetdicom calls it "Unknown") is reported as
    ``Failure``: an operation whose outcome cannot be understood did not succeed, and a
    caller deciding "retry / give up / count as stored" must not count it as stored.
    """
    if status == 0x0000:
        return SUCCESS
    high = status >> 12
    if high == 0xF:
        if status in (0xFF00, 0xFF01):
            return PENDING
        if status == 0xFE00:
            return CANCEL
        return FAILURE
    if high == 0xB or status in _WARNINGS_01XX:
        return WARNING
    return FAILURE
