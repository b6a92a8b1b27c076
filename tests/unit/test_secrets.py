import logging
import pickle

import pytest

from deployer.secrets import RedactingFilter, Secret, mask, scrub, secret_forms

pytestmark = pytest.mark.unit

RAW = "8d2f6a1c-secret-uuid-77aa"


def test_mask_keeps_at_most_last_four():
    assert mask(RAW) == "…77aa"
    assert mask("abc") == "****"


def test_secret_never_prints_raw():
    s = Secret(RAW)
    for text in (str(s), repr(s), f"{s}", f"{s:>40}", " ".join([str(s)])):
        assert RAW not in text
    assert s.reveal() == RAW
    with pytest.raises(TypeError):
        pickle.dumps(s)


def test_scrub_replaces_longest_first():
    short = RAW[:10]
    assert scrub(f"id={RAW} short={short}", [RAW, short]) == f"id={mask(RAW)} short={mask(short)}"


def test_filter_scrubs_message_args_and_traceback(caplog):
    logger = logging.getLogger("deployer.test_secrets")
    flt = RedactingFilter([RAW])
    handler_records = []

    class Capture(logging.Handler):
        def emit(self, record):
            handler_records.append(self.format(record))

    handler = Capture()
    handler.addFilter(flt)
    logger.addHandler(handler)
    try:
        logger.warning("call failed for %s", RAW)
        try:
            raise ValueError(f"bad dbid {RAW}")
        except ValueError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(handler_records)
    assert "call failed for …77aa" in text
    assert "ValueError: bad dbid …77aa" in text
    assert RAW not in text


def test_a_blank_secret_masks_nothing():
    assert scrub("a b  c", [" ", "", "  "]) == "a b  c"


def test_secret_forms_cover_url_and_literal_quoting():
    forms = secret_forms(['a"b\\c/d'])
    for form in ('a"b\\c/d', 'a\\"b\\\\c/d', "a%22b%5Cc%2Fd"):
        assert form in forms
    assert secret_forms(["", " "]) == []
