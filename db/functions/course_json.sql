-- Text that should hold JSON, as jsonb; NULL when it does not parse (the course's toolcalls
-- and toolschemas columns are free text).
CREATE OR REPLACE FUNCTION course_json(p_text text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE SET search_path FROM CURRENT AS $$
BEGIN
    RETURN p_text::jsonb;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;
