from gateway.server import key_matches


def test_key_matches_any_configured_key_exactly():
    keys = ["sk-one", "sk-two"]
    assert key_matches("sk-two", keys) and key_matches("sk-one", keys)
    assert not key_matches("sk-tw", keys) and not key_matches("sk-two ", keys) and not key_matches("", keys)
    assert not key_matches("sk-one", [])
    assert key_matches("clé-ü", ["clé-ü"])  # non-ASCII keys compare as UTF-8 bytes
