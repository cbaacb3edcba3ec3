-- Inserts only: the relay's own UPDATEs (marking rows published) and any
-- DELETEs by retention do not come back through the slot.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {{publication_literal}}) THEN
    CREATE PUBLICATION {{publication}} FOR TABLE {{table}} WITH (publish = 'insert');
  END IF;
END
$$;
