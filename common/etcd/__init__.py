"""etcd for every service: the client and its auth/TLS settings, sessions (lease + keepalive), the key
schema under /tandem/<cluster>/, and prefix mirrors fed by watches (docs/etcd.md)."""
