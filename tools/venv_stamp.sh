# Sourced by the setup scripts: a venv is rebuilt only when its pinned inputs (or this checkout's
# location, which editable installs and console scripts record) change.
#   venv_is_current VENV FILE...   true when VENV was built from exactly these FILEs here
#   venv_mark_current VENV FILE... record that it was
venv_stamp() { (cat "$@"; pwd) | sha256sum | cut -d' ' -f1; }
venv_is_current() {
  local venv=$1; shift
  [ -x "$venv/bin/python" ] && [ -f "$venv/.soup-requirements.sha" ] &&
    [ "$(cat "$venv/.soup-requirements.sha")" = "$(venv_stamp "$@")" ]
}
venv_mark_current() { local venv=$1; shift; venv_stamp "$@" > "$venv/.soup-requirements.sha"; }
