"""The metrics side of pacs-receiver.

- :mod:`metrics.records`: the telemetry records (kinds, fields, histogram bounds);
- :mod:`metrics.wire`: their codec -- frames, msgpack, validation, label bounds -- and
  the one contract with the workers (msgpack only; re-exports every record name);
- :mod:`metrics.sender`: the sending end, one connection to the aggregator with
  batches, back-off and re-sending (extended by :class:`workers.telemetry.Telemetry`);
- :mod:`metrics.procstat`: a process's CPU time and resident memory, without psutil;
- :mod:`metrics.aggregator`: the aggregator process (``python -m metrics``): frames in,
  Prometheus exposition out; it counts into :mod:`metrics.state` and exposes through
  :mod:`metrics.exposition`. Only the aggregator side (aggregator, exposition, http)
  imports prometheus-client, so importing the package stays cheap for the workers.
"""
