-- Functions nothing calls: conversation_of and end_turn's eight-argument form, and the
-- earlier signatures of begin_turn, which a database set up by an older chatterd may
-- still hold.  db/functions/ defines every function chatterd calls.
DROP FUNCTION IF EXISTS conversation_of(text);
DROP FUNCTION IF EXISTS end_turn(bigint, text, text, text, jsonb, text, integer, boolean);
DROP FUNCTION IF EXISTS begin_turn(text, text, double precision, jsonb, boolean);
DROP FUNCTION IF EXISTS begin_turn(text, text, double precision, jsonb, boolean,
                                   double precision);
DROP FUNCTION IF EXISTS begin_turn(text, text, double precision, jsonb, boolean,
                                   double precision, integer, integer);
DROP FUNCTION IF EXISTS begin_turn(text, text, double precision, jsonb, boolean,
                                   double precision, integer, integer, bigint[], bigint);
