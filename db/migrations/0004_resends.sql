-- Resends: a turn that ended (complete or failed) but whose end never reached its client
-- (the process died between the commit and the `done` line or error event, say) is
-- answered again from storage when the client sends the same messages again, instead of
-- being stored twice.  `delivered` is set once the final event was handed to the client.

ALTER TABLE turns ADD COLUMN delivered boolean NOT NULL DEFAULT false;
