"""gc_paused: the collector paused around bulk graph work, what it built promoted unscanned."""

import gc
import sys

from graphopt.gc_pause import gc_paused


def test_gc_paused_promotes_what_it_built_unscanned():
    gc.collect()
    with gc_paused():
        assert not gc.isenabled()
        built = [[i] for i in range(1000)]
    assert gc.isenabled() and gc.get_freeze_count() == 0
    if sys.version_info < (3, 14):  # three generations, 2 the oldest (3.14's collector differs)
        assert any(o is built for o in gc.get_objects(2))  # young collections will not scan it
