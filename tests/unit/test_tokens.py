"""Join tokens: one use, expiry, node binding, persistence."""

import json
import os
import stat

import pytest

from agent.control.tokens import TokenError, TokenStore


def test_token_works_once_for_its_node_and_survives_restart(tmp_path):
    s = TokenStore(str(tmp_path))
    t = s.create("n1", 3600)
    with pytest.raises(TokenError, match="is for node 'n1', not 'n2'"):
        s.consume(t, "n2")
    s2 = TokenStore(str(tmp_path))  # a restart
    s2.consume(t, "n1")
    with pytest.raises(TokenError, match="already used"):
        TokenStore(str(tmp_path)).consume(t, "n1")
    assert stat.S_IMODE(os.stat(tmp_path / "tokens.json").st_mode) == 0o600
    assert t.split(".")[1] not in (tmp_path / "tokens.json").read_text()  # only a hash is stored


def test_expired_and_unknown_tokens(tmp_path):
    s = TokenStore(str(tmp_path))
    t = s.create("n1", 3600)
    data = json.loads((tmp_path / "tokens.json").read_text())
    data[t.split(".")[0]]["expires"] = 0
    (tmp_path / "tokens.json").write_text(json.dumps(data))
    with pytest.raises(TokenError, match="expired"):
        TokenStore(str(tmp_path)).consume(t, "n1")
    with pytest.raises(TokenError, match="unknown join token"):
        s.consume(t.split(".")[0] + ".wrongsecret", "n1")
    with pytest.raises(TokenError, match="unknown join token"):
        s.consume("garbage", "n1")
