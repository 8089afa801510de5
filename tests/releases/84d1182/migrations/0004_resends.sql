-- Resends: a turn that ended (complete or failed) but whose end never reached its client
-- (the process died between the commit and the `done` line or error event, say) is
-- answered again from storage when the client sends the same messages again, instead of
-- being stored twice.  `delivered` is set once the final event was handed to the client.

ALTER TABLE turns ADD COLUMN delivered boolean NOT NULL DEFAULT false;

DROP FUNCTION begin_turn(text, text, double precision, jsonb, boolean);

-- As 0002's begin_turn, plus: when the appID's last ended turn is complete or failed, undelivered,
-- ended less than p_resend_seconds ago and had exactly these incoming messages, nothing
-- is stored, the lease is not kept, and `replay` holds that turn's stored reply.
CREATE FUNCTION begin_turn(p_appid text, p_owner text, p_lease_seconds double precision,
                           p_messages jsonb, p_replace boolean DEFAULT false,
                           p_resend_seconds double precision DEFAULT 0)
RETURNS TABLE (turn_id bigint, history jsonb, replay jsonb)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_turn bigint := nextval('turn_ids');
    v_last turns%ROWTYPE;
    v_reply jsonb;
BEGIN
    INSERT INTO leases AS l (appid, turn_id, owner, expires_at)
    VALUES (p_appid, v_turn, p_owner, clock_timestamp() + make_interval(secs => p_lease_seconds))
    ON CONFLICT (appid) DO UPDATE
        SET turn_id = EXCLUDED.turn_id, owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
        WHERE l.expires_at <= clock_timestamp();
    IF NOT FOUND THEN
        RETURN;  -- busy
    END IF;
    UPDATE turns SET status = 'abandoned', ended_at = now(),
                     error = 'its chatterd process stopped before the turn ended'
     WHERE appid = p_appid AND status = 'running';
    IF p_resend_seconds > 0 AND NOT p_replace THEN
        SELECT * INTO v_last FROM turns
         WHERE appid = p_appid AND status IN ('complete', 'interrupted', 'failed')
         ORDER BY id DESC LIMIT 1;
        IF v_last.status IN ('complete', 'failed') AND NOT v_last.delivered
           AND v_last.ended_at > now() - make_interval(secs => p_resend_seconds)
           AND (SELECT jsonb_agg(jsonb_build_object('role', role, 'content', content,
                                                    'extra', extra) ORDER BY seq)
                  FROM messages WHERE messages.turn_id = v_last.id AND role <> 'assistant')
               = (SELECT jsonb_agg(jsonb_build_object('role', e.m->'role', 'content', e.m->'content',
                                                      'extra', nullif(e.m->'extra', 'null'::jsonb))
                                   ORDER BY e.i)
                    FROM jsonb_array_elements(p_messages) WITH ORDINALITY AS e(m, i)) THEN
            SELECT jsonb_build_object('content', content, 'extra', extra, 'model', model,
                                      'tokens', tokens, 'status', v_last.status,
                                      'error', v_last.error)
              INTO v_reply FROM messages
             WHERE messages.turn_id = v_last.id AND role = 'assistant' ORDER BY seq DESC LIMIT 1;
            DELETE FROM leases WHERE appid = p_appid AND leases.turn_id = v_turn;
            RETURN QUERY SELECT v_last.id, NULL::jsonb,
                coalesce(v_reply, jsonb_build_object('status', v_last.status, 'error', v_last.error));
            RETURN;
        END IF;
    END IF;
    IF p_replace THEN
        DELETE FROM turns WHERE appid = p_appid;  -- messages go with them (cascade)
    END IF;
    INSERT INTO turns (id, appid, owner) VALUES (v_turn, p_appid, p_owner);
    INSERT INTO messages (appid, turn_id, role, content, extra)
    SELECT p_appid, v_turn, e.m->>'role', e.m->>'content', nullif(e.m->'extra', 'null'::jsonb)
      FROM jsonb_array_elements(p_messages) WITH ORDINALITY AS e(m, i)
     ORDER BY e.i;
    RETURN QUERY SELECT v_turn,
        CASE WHEN p_replace THEN '[]'::jsonb ELSE conversation_of(p_appid) END, NULL::jsonb;
END
$$;
