"""The metrics side of pacs-receiver.

- :mod:`metrics.wire`: the telemetry frame schema, the one contract with the workers
  (msgpack only; workers import it);
- :mod:`metrics.procstat`: a process's CPU time and resident memory, without psutil;
- :mod:`metrics.aggregator`: the aggregator process (``python -m metrics``): frames in,
  Prometheus exposition out. Only this module imports prometheus-client, so importing
  the package stays cheap for the workers.
"""
