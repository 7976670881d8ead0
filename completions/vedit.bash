# vedit completion for bash; generated from the app by `python -m vedit.completions`.
_vedit() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    local cmd="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in -*) ;; *) cmd="${COMP_WORDS[i]}"; break ;; esac
    done
    case "$cmd" in
        "")
            if [[ $cur == -* ]]; then words="--version --install-completion --show-completion --help -h"; else words="demo doctor edit extract fetch-models remux score status tune"; fi
            COMPREPLY=($(compgen -W "$words" -- "$cur")) ;;
        demo)
            case "$prev" in
                --output|-o) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --model|-m) return ;;
            esac
            if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "--output -o --model -m --sdxl --json --quiet -q --debug --help -h" -- "$cur")); else COMPREPLY=($(true)); fi ;;
        doctor)
            case "$prev" in
            esac
            if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "--json --quiet -q --debug --help -h" -- "$cur")); else COMPREPLY=($(true)); fi ;;
        edit)
            case "$prev" in
                --prompt|-p) return ;;
                --prompts-file) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --name) return ;;
                --checkpoint) return ;;
                --steps) return ;;
                --guidance) return ;;
                --negative-prompt) return ;;
                --seed) return ;;
                --formats) return ;;
                --batch) return ;;
                --window) return ;;
                --overlap) return ;;
                --full-stride) return ;;
                --gpu-memory) return ;;
                --config) COMPREPLY=($(compgen -f -- "$cur")); return ;;
            esac
            if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "--prompt -p --prompts-file --name --checkpoint --steps --guidance --negative-prompt --seed --formats --batch --inversion --no-inversion --inversion-prompt --empty-inversion-prompt --full --tuned-frames --window --overlap --full-stride --score --no-score --dry-run --gpu-memory --config --json --quiet -q --debug --help -h" -- "$cur")); else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
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
        fetch-models)
            case "$prev" in
                --revision) return ;;
                --variant) return ;;
            esac
            if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "--revision --variant --scoring --list --configs-only --json --quiet -q --debug --help -h" -- "$cur")); else COMPREPLY=($(true)); fi ;;
        remux)
            case "$prev" in
                --video) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --output|-o) COMPREPLY=($(compgen -f -- "$cur")); return ;;
            esac
            if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "--video --output -o --json --quiet -q --debug --help -h" -- "$cur")); else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        score)
            case "$prev" in
                --source) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --prompt|-p) return ;;
                --clip-model) return ;;
                --csv) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --config) COMPREPLY=($(compgen -f -- "$cur")); return ;;
            esac
            if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "--source --prompt -p --clip-model --csv --config --json --quiet -q --debug --help -h" -- "$cur")); else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        status)
            case "$prev" in
            esac
            if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "--json --quiet -q --debug --help -h" -- "$cur")); else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        tune)
            case "$prev" in
                --prompt|-p) return ;;
                --project) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --model|-m) return ;;
                --steps) return ;;
                --lr) return ;;
                --lora-lr) return ;;
                --rank) return ;;
                --lora-targets) return ;;
                --batch) return ;;
                --grad-accum) return ;;
                --seed) return ;;
                --mixed-precision) return ;;
                --checkpoint-every) return ;;
                --frames|-n) return ;;
                --stride) return ;;
                --start) return ;;
                --end) return ;;
                --size) return ;;
                --gpu-memory) return ;;
                --config) COMPREPLY=($(compgen -f -- "$cur")); return ;;
            esac
            if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "--prompt -p --project --model -m --steps --lr --lora-lr --rank --lora-targets --batch --grad-accum --seed --mixed-precision --gradient-checkpointing --no-gradient-checkpointing --checkpoint-every --eval --no-eval --resume --frames -n --stride --start --end --spread --no-spread --size --crop --no-crop --dry-run --gpu-memory --config --json --quiet -q --debug --help -h" -- "$cur")); else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
    esac
}
complete -o filenames -F _vedit vedit
