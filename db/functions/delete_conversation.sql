-- Delete everything of owner p_owner_id's conversation p_appid, in one transaction: its
-- turns and their messages, its row (size, title), its kept tool schemas and its lease
-- (DELETE /conversations/{appID}, db/conversation_records.py).  Returns 'deleted', 'missing'
-- (the owner has nothing under this appID: another owner's conversation of the same appID
-- is not reached, nor told apart from one that never existed) or 'running' (a live turn
-- holds the lease: nothing is deleted, the client retries once it has ended).
--
-- The lease row is locked first: a turn that begins meanwhile waits for this transaction
-- and then starts a new conversation, never one half deleted.  A turn whose process died
-- (its lease expired, the turn still marked running) does not stop the deletion.
CREATE OR REPLACE FUNCTION delete_conversation(p_owner_id bigint, p_appid text) RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_live boolean;
    v_found boolean := false;
BEGIN
    SELECT l.expires_at > clock_timestamp() INTO v_live FROM leases l
     WHERE l.owner_id = p_owner_id AND l.appid = p_appid FOR UPDATE;
    IF v_live THEN
        RETURN 'running';
    END IF;
    DELETE FROM leases WHERE owner_id = p_owner_id AND appid = p_appid;
    DELETE FROM turns WHERE owner_id = p_owner_id AND appid = p_appid;  -- messages go too
    v_found := v_found OR FOUND;
    DELETE FROM conversation_sizes WHERE owner_id = p_owner_id AND appid = p_appid;
    v_found := v_found OR FOUND;
    DELETE FROM tool_schemas WHERE owner_id = p_owner_id AND appid = p_appid;
    v_found := v_found OR FOUND;
    RETURN CASE WHEN v_found THEN 'deleted' ELSE 'missing' END;
END
$$;
