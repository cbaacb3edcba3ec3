-- Debezium's layout carries the trace context in its own column,
-- tracingspancontext (RELAY_COLUMNS=debezium reads it): a Debezium table
-- gets no traceparent or tracestate columns.
SELECT 1;
