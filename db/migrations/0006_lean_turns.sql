-- How many of a turn's messages are its incoming ones (the first, by seq): a turn's tool
-- rounds add messages of their own, and a resend repeats only the incoming ones
-- (begin_turn, db/functions/begin_turn.sql).
ALTER TABLE turns ADD COLUMN nincoming integer;
