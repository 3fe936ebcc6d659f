"""BIND key-file parser (services.dns.tsigkey)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, strategies as st

from services.dns.tsigkey import KeyFileError, parse_key_file, select_key

KEYGEN = '''key "appliance-key" {
\talgorithm hmac-sha256;
\tsecret "rOCVIKJ7soCh+x7zgbchEgUzzIU7gM4ToLfTmkUx/xU=";
};
'''


def test_reads_tsig_keygen_output():
    """What ``tsig-keygen -a hmac-sha256 NAME`` prints parses to one key."""
    (key,) = parse_key_file(KEYGEN)
    assert (key.name, key.algorithm) == ("appliance-key", "hmac-sha256")
    assert key.dns_key().name.to_text() == "appliance-key."


def test_comments_and_several_keys_and_selection():
    """Comments of all three styles are ignored; with several keys one is chosen by name."""
    text = "# a comment\n// another\n/* block\n comment */\n" + KEYGEN + KEYGEN.replace(
        "appliance-key", "second").replace("hmac-sha256", "hmac-sha512")
    keys = parse_key_file(text)
    assert [k.name for k in keys] == ["appliance-key", "second"]
    assert select_key(keys, "second").algorithm == "hmac-sha512"
    with pytest.raises(KeyFileError, match="holds 2 keys"):
        select_key(keys, None)
    with pytest.raises(KeyFileError, match="has no key 'third'"):
        select_key(keys, "third")


@pytest.mark.parametrize("text,why", [
    ("", "no key"),
    ('key "k" { algorithm hmac-sha256; };', 'missing "secret"'),
    ('key "k" { secret "c2VjcmV0c2VjcmV0"; };', 'missing "algorithm"'),
    ('key "k" { algorithm hmac-foo; secret "c2VjcmV0c2VjcmV0"; };', "is not one of"),
    ('key "k" { algorithm hmac-sha256; secret "!!!"; };', "not base64"),
    ('key "k" { algorithm hmac-sha256; secret "c2VjcmV0c2VjcmV0"; }; junk', "unexpected text"),
    ('key "k" { algorithm hmac-sha256; secret "c2VjcmV0c2VjcmV0"; port 5; };', "unknown statement"),
])
def test_bad_files_say_why(text, why):
    """Every unusable file raises KeyFileError with the reason."""
    with pytest.raises(KeyFileError, match=why):
        parse_key_file(text)


@given(st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True), st.binary(min_size=16, max_size=64),
       st.sampled_from(["hmac-sha256", "hmac-sha512", "hmac-sha1"]))
def test_round_trip(name, secret, algorithm):
    """Any key written in BIND format reads back identically."""
    b64 = base64.b64encode(secret).decode()
    (key,) = parse_key_file(f'key "{name}" {{\n algorithm {algorithm};\n secret "{b64}";\n}};\n')
    assert (key.name, key.algorithm, key.secret) == (name, algorithm, b64)


def test_key_object_built_once_and_secret_not_in_repr():
    """The dnspython key is built once per TSIGKey; repr() never shows the secret."""
    from services.dns.tsigkey import TSIGKey
    key = TSIGKey("k", "hmac-sha256", "c2VjcmV0LXNlY3JldC1zZWNyZXQ=")
    assert key.dns_key() is key.dns_key() and key.keyname is key.keyname
    assert "c2VjcmV0" not in repr(key)
