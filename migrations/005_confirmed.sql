-- Events the broker confirmed whose rows the relay could not mark yet
-- because their transaction was not visible: a commit waiting for a
-- synchronous standby is not visible to other sessions, and when the relay's
-- own walsender is that standby, it becomes visible only after the relay
-- acknowledges its position (DESIGN.md, invariant 1's exception). A row here
-- stands in for published_at until the relay sets it and deletes the row;
-- the replay filter and the table sweep treat these ids as published.
CREATE TABLE IF NOT EXISTS outbox_relay_confirmed (
  slot_name   text NOT NULL,
  id          uuid NOT NULL,
  xid         xid8 NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (slot_name, id)
);
