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


# --- where a credential is masked (issue 11, item 6) ------------------------------------------

SHORT = "0556"  # a short numeric dbid: its digits turn up inside run ids, hashes and times


def test_a_short_credential_is_masked_on_its_own_but_not_inside_ids_and_hashes():
    run_id = f"20250101T000000Z-{SHORT}ab"
    sha = "ab" + SHORT + "c" * 58
    path = f"/opt/x/.client.py.deployer/runs/{run_id}/new-script"
    kept = f"run {run_id} sha256 {sha} at {path} took 10556 ms, backup client.py.{SHORT}ffff"
    assert scrub(kept, [SHORT]) == kept
    for shown in (
        f"dbid {SHORT}",
        f"GET /api/connect?dbid={SHORT}&user_id=u",
        f"dbid='{SHORT}'",
        f'{{"dbid": "{SHORT}"}}',
        f"--dbid={SHORT}\n",
        f"{SHORT}",
        f"id_{SHORT}_x",
    ):
        masked = scrub(shown, [SHORT])
        assert SHORT not in masked, shown
        assert "****" in masked


def test_a_long_credential_is_masked_even_inside_a_longer_word():
    assert scrub(f"x{RAW}y and {RAW}", [RAW]) == f"x{mask(RAW)}y and {mask(RAW)}"


def test_a_credential_with_symbols_at_its_ends_is_masked_between_letters():
    raw = "&a<"
    assert raw not in scrub(f"b{raw}c", [raw])
