-- A table of the application's own layout gets no trace columns: map its
-- own with RELAY_COLUMNS (traceparent=, tracestate= or
-- tracing_span_context=), or add them yourself.
SELECT 1;
