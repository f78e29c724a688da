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
# ensure_venv VENV MESSAGE INSTALL FILE...: unless VENV is current for FILEs, say MESSAGE, make the venv
# with $PYTHON, upgrade pip and run the shell function INSTALL VENV; then record the FILEs
ensure_venv() {
  local venv=$1 message=$2 install=$3 tool
  shift 3
  tool=$(basename "$0" .sh)
  if venv_is_current "$venv" "$@"; then
    echo "$tool: $venv is up to date"
    return
  fi
  echo "$tool: $message"
  "$PYTHON" -m venv "$venv"
  rm -f "$venv"/.soup-extra-*.sha  # extras go on top of the pinned stack: install them again
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$install" "$venv"
  venv_mark_current "$venv" "$@"
}
# ensure_extra VENV NAME REQUIREMENTS: the pinned packages of an optional extra, on top of VENV's stack
ensure_extra() {
  local venv=$1 name=$2 requirements=$3 stamp="$1/.soup-extra-$2.sha"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(venv_stamp "$requirements")" ]; then
    return
  fi
  echo "$(basename "$0" .sh): installing the $name extra ($requirements) into $venv"
  "$venv/bin/python" -m pip install --quiet -r "$requirements"
  venv_stamp "$requirements" > "$stamp"
}
