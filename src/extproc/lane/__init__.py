"""The compiled fast lane: ``lane.c``, an Envoy dynamic module, and how it is built."""
