-- Delete every conversation of owner p_owner_id, in one transaction: their turns and
-- messages, rows, tool schemas and leases (a user whose account is deleted; called by
-- db/conversation_records.py delete_owner).  Returns how many conversations there were.
-- A turn of theirs still running is not waited for: its end finds no turn and reports it
-- lost.  The anonymous namespace (owner 0) holds the conversations of everyone without
-- credentials and is never deleted as a whole.
CREATE OR REPLACE FUNCTION delete_owner(p_owner_id bigint) RETURNS bigint
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_count bigint;
BEGIN
    IF p_owner_id = 0 THEN
        RAISE EXCEPTION 'the anonymous namespace (owner 0) is not deleted as a whole';
    END IF;
    SELECT count(*) INTO v_count
      FROM (SELECT appid FROM conversation_sizes WHERE owner_id = p_owner_id
            UNION SELECT appid FROM turns WHERE owner_id = p_owner_id
            UNION SELECT appid FROM tool_schemas WHERE owner_id = p_owner_id) c;
    DELETE FROM leases WHERE owner_id = p_owner_id;
    DELETE FROM turns WHERE owner_id = p_owner_id;  -- messages go too
    DELETE FROM conversation_sizes WHERE owner_id = p_owner_id;
    DELETE FROM tool_schemas WHERE owner_id = p_owner_id;
    RETURN v_count;
END
$$;
