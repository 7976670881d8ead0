# vedit completion for bash; generated from the app by `python -m vedit.completions`.
_vedit() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    local cmd="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in -*) ;; *) cmd="${COMP_WORDS[i]}"; break ;; esac
    done
    case "$cmd" in
        "")
            if [[ $cur == -* ]]; then words="--version --install-completion --show-completion --help -h"; else words="extract remux"; fi
            COMPREPLY=($(compgen -W "$words" -- "$cur")) ;;
        extract)
            case "$prev" in
                --output|-o) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --frames|-n) return ;;
                --stride) return ;;
                --start) return ;;
                --end) return ;;
                --size) return ;;
                --config) COMPREPLY=($(compgen -f -- "$cur")); return ;;
            esac
            if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "--output -o --frames -n --stride --start --end --spread --no-spread --size --crop --no-crop --config --json --quiet -q --debug --help -h" -- "$cur")); else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        remux)
            case "$prev" in
                --video) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --output|-o) COMPREPLY=($(compgen -f -- "$cur")); return ;;
            esac
            if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "--video --output -o --json --quiet -q --debug --help -h" -- "$cur")); else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
    esac
}
complete -o filenames -F _vedit vedit
