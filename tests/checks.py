"""Assertions shared by the test modules that check the library's error messages."""
import re

import pytest


def raises(argument: str, fix: str, fn, *args, **kw) -> str:
    """Call fn; it must raise a ValueError starting with 'argument: ' whose message matches the regex `fix`."""
    with pytest.raises(ValueError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert msg.startswith(f"{argument}: "), msg
    assert re.search(fix, msg), f"no fix in: {msg}"
    return msg
