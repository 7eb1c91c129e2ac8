"""Helpers for testing SafeConf, and for trying it on one machine (local_cluster: a multi-node Ray on loopback)."""
