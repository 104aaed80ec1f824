"""Runtime templates: built-ins, sip dict, the safe direct header form, set_var, BYE headers, no raising."""

from twisted.trial import unittest

from activecall.playbook import templates as t

CALL = t.CallInfo(
    session_id="s-1", call_type="sip", start_time="2025-01-02T03:04:05Z", caller="sip:alice@a", callee="sip:bot@b"
)


class ContextTests(unittest.TestCase):
    def test_builtins_do_not_overwrite(self):
        ctx = t.template_context({"caller": "Bob"}, CALL)
        self.assertEqual(ctx["caller"], "Bob")
        self.assertEqual((ctx["session_id"], ctx["call_type"], ctx["callee"]), ("s-1", "sip", "sip:bot@b"))
        self.assertEqual(ctx["start_time"], "2025-01-02T03:04:05Z")

    def test_private_variables_hidden(self):
        ctx = t.template_context({"_hangup_headers": "{}", "a": "1"}, CALL)
        self.assertNotIn("_hangup_headers", ctx)
        self.assertNotIn("_hangup_headers", ctx["vars"])

    def test_sip_dict_holds_headers_only(self):
        ctx = t.template_context({"X-Cid": "7", "Branch": "north", "plain": "p", "_sip_header_keys": ["Branch"]})
        self.assertEqual(dict(ctx["sip"]), {"X-Cid": "7", "Branch": "north"})


class RenderTests(unittest.TestCase):
    def render(self, template, variables=None, call=CALL):
        return t.render(template, t.template_context(variables or {}, call))

    def test_builtins_and_variables(self):
        self.assertEqual(self.render("{{ session_id }}/{{ call_type }}: hi {{ name }}", {"name": "Ann"}), "s-1/sip: hi Ann")

    def test_sip_header_forms(self):
        variables = {"X-Customer-Name": "Zoe"}
        self.assertEqual(self.render('Hi {{ sip["X-Customer-Name"] }}', variables), "Hi Zoe")
        self.assertEqual(self.render('Hi {{ sip["x-customer-name"] }}', variables), "Hi Zoe")
        # the safe direct form, instead of the original's subtraction error
        self.assertEqual(self.render("Hi {{ X-Customer-Name }}", variables), "Hi Zoe")
        self.assertEqual(self.render("Hi {{X-Customer-Name}}!", variables), "Hi Zoe!")
        self.assertEqual(self.render('{{ vars["X-Customer-Name"] }}', variables), "Zoe")

    def test_undefined_renders_empty(self):
        self.assertEqual(self.render("[{{ nope }}][{{ nope.deeper }}][{{ sip['X-None'] }}][{{ X-Missing }}]"), "[][][][]")

    def test_errors_fall_back_to_raw(self):
        broken = "Hello {{ name "
        self.assertEqual(self.render(broken), broken)
        self.assertEqual(t.render(broken, {}, fallback="old prompt"), "old prompt")
        # arithmetic on strings fails at render time: still no exception
        self.assertEqual(self.render("{{ a - b }}", {"a": "x", "b": "y"}), "{{ a - b }}")

    def test_sandbox_blocks_unsafe_access(self):
        evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
        self.assertEqual(self.render(evil), evil)

    def test_plain_text_untouched(self):
        self.assertEqual(self.render("no templates {here}"), "no templates {here}")

    def test_jinja_control_flow(self):
        self.assertEqual(self.render("{% if vip %}VIP {% endif %}{{ name | upper }}", {"vip": "1", "name": "x"}), "VIP X")


class VariableTests(unittest.TestCase):
    def test_set_var_stores_strings(self):
        variables = {}
        t.set_var(variables, "result", "ok")
        t.set_var(variables, "n", 5)
        self.assertEqual(variables, {"result": "ok", "n": "5"})

    def test_set_var_hangup_headers_must_be_json_map(self):
        variables = {}
        t.set_var(variables, "_hangup_headers", "not json")
        self.assertEqual(variables, {})
        t.set_var(variables, "_hangup_headers", '{"X-A": "1"}')
        self.assertEqual(variables, {"_hangup_headers": '{"X-A": "1"}'})

    def test_bye_headers(self):
        variables = {"result": "solved", "X-Customer-ID": "C1", "_hangup_headers": '{"X-Bulk": "b", "X-Result": "old"}'}
        headers = t.bye_headers(
            {"X-Result": "{{ result }}", "X-Customer": '{{ sip["X-Customer-ID"] }}', "X-Unset": "{{ nothing }}",
             "X-Broken": "{{ oops"},
            variables,
            CALL,
        )
        self.assertEqual(
            headers,
            {"X-Bulk": "b", "X-Result": "solved", "X-Customer": "C1", "X-Unset": "", "X-Broken": "{{ oops"},
        )

    def test_bye_headers_keep_bulk_without_templates(self):
        self.assertEqual(t.bye_headers({}, {"_hangup_headers": '{"X-A": "1"}'}), {"X-A": "1"})
        self.assertEqual(t.bye_headers({}, {}), {})

    def test_extract_header_vars(self):
        headers = {"x-customer-id": "C42", "X-Other": "o", "X-Phone": "tel:+15551234"}
        got = t.extract_header_vars(headers, ["X-Customer-ID", "X-Phone"], {"X-Phone": r"\+(\d+)"})
        self.assertEqual(got, {"x-customer-id": "C42", "X-Phone": "15551234", "_sip_header_keys": ["X-Phone", "x-customer-id"]})
        self.assertEqual(t.extract_header_vars(headers, ["X-Phone"], {"X-Phone": "^sip:"}), {"_sip_header_keys": []})
        self.assertEqual(t.extract_header_vars(headers, None), {})
