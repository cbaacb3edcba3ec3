-- Per-slot state the relay must keep across crashes: whether the table
-- sweep that follows slot creation has finished. A slot whose sweep was
-- interrupted is dropped and recreated, so the sweep runs again on a fresh
-- snapshot and no row written before the slot is ever missed.
CREATE TABLE IF NOT EXISTS outbox_relay_slot_state (
  slot_name     text PRIMARY KEY,
  sweep_pending boolean NOT NULL,
  updated_at    timestamptz NOT NULL DEFAULT now()
);
