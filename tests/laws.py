"""The operator-law checks ship as ``streamattn.testing.laws``; this name stays for old imports."""

from streamattn.testing.laws import (
    assert_plain_state,
    blocks_of,
    check_operator_laws,
    fold,
    fold_tree,
)

__all__ = ["assert_plain_state", "blocks_of", "check_operator_laws", "fold", "fold_tree"]
