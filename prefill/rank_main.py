"""A follower rank of a TP x PP prefill worker: the engine's follower loop with the KV connector
(prefill/shipping.py) that ships this rank's pages."""

import sys

from engine.rank_main import main
from prefill.shipping import Shipper

if __name__ == "__main__":
    sys.exit(main(connector=Shipper()))
