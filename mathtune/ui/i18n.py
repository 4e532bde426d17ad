"""The UI's words in English and Spanish. The page follows the browser's language (Accept-Language)
until the user picks one (a `lang` cookie). Messages from mathtune itself (data problems, config
validation) stay in English, as in the terminal: they name files, keys and values."""

from __future__ import annotations

LANGUAGES = ("en", "es")

STRINGS: dict[str, tuple[str, str]] = {
    # key: (English, Spanish)
    "runs": ("Runs", "Entrenamientos"),
    "new_run": ("New run", "Nuevo entrenamiento"),
    "no_runs": ("No runs yet in {folder}.", "Todavía no hay entrenamientos en {folder}."),
    "name": ("Name", "Nombre"),
    "status": ("Status", "Estado"),
    "model": ("Model", "Modelo"),
    "steps": ("Steps", "Pasos"),
    "eval_loss": ("Eval loss before → after", "Pérdida de evaluación antes → después"),
    "accuracy": ("Verified accuracy base → fine-tuned", "Precisión verificada base → ajustado"),
    "st_running": ("running", "en curso"),
    "st_finished": ("finished", "terminado"),
    "st_interrupted": ("interrupted", "interrumpido"),
    "st_failed": ("failed", "falló"),
    "st_incomplete": ("incomplete", "incompleto"),
    "step_model": ("1. Model", "1. Modelo"),
    "embedded": ("Embedded default: SmolLM2-135M-Instruct (GGUF)", "Modelo incluido: SmolLM2-135M-Instruct (GGUF)"),
    "lmstudio_models": ("Your LM Studio models", "Tus modelos de LM Studio"),
    "cached": ("converted copy cached", "copia convertida en caché"),
    "not_trainable": ("cannot be trained", "no se puede entrenar"),
    "model_path": ("Or a path: a .gguf file or a Transformers folder",
                   "O una ruta: un archivo .gguf o una carpeta de Transformers"),
    "use": ("Use", "Usar"),
    "step_data": ("2. Data", "2. Datos"),
    "bundled_data": ("No file chosen: the bundled math dataset (Spanish and English).",
                     "Ningún archivo elegido: el conjunto de matemáticas incluido (español e inglés)."),
    "upload": ("Upload JSON or JSONL", "Subir JSON o JSONL"),
    "data_path": ("Or a path to a JSON/JSONL file", "O la ruta de un archivo JSON/JSONL"),
    "add": ("Add", "Añadir"),
    "remove": ("Remove", "Quitar"),
    "check_ok": ("Every record is valid", "Todos los registros son válidos"),
    "check_bad": ("{n} problem(s): fix the file and upload it again", "{n} problema(s): corrige el archivo y vuelve a subirlo"),
    "records": ("records", "registros"),
    "stats": ("Statistics", "Estadísticas"),
    "step_settings": ("3. Settings", "3. Ajustes"),
    "more_settings": ("More settings", "Más ajustes"),
    "run_name": ("Run name", "Nombre del entrenamiento"),
    "memory": ("Memory", "Memoria"),
    "fits": ("fits: {total} of {room} GiB", "cabe: {total} de {room} GiB"),
    "no_fit": ("does NOT fit: {total} of {room} GiB", "NO cabe: {total} de {room} GiB"),
    "fits_with": ("fits with", "cabe con"),
    "start": ("Start training", "Empezar a entrenar"),
    "fix_first": ("Fix the data problems before starting.", "Corrige los problemas de los datos antes de empezar."),
    "problems": ("Problems", "Problemas"),
    "loss": ("Loss", "Pérdida"),
    "train_loss": ("train", "entrenamiento"),
    "eval_loss_short": ("eval", "evaluación"),
    "reward": ("Reward (GRPO)", "Recompensa (GRPO)"),
    "reward_mean": ("reward", "recompensa"),
    "share_correct": ("share correct", "proporción correcta"),
    "progress": ("Progress", "Progreso"),
    "tokens_s": ("tokens/s", "tokens/s"),
    "time_left": ("time left", "tiempo restante"),
    "log": ("Log", "Registro"),
    "stop": ("Stop (save a checkpoint)", "Parar (guardar un punto de control)"),
    "resume": ("Resume", "Reanudar"),
    "results": ("Results", "Resultados"),
    "chat": ("Chat", "Chat"),
    "export": ("Export", "Exportar"),
    "no_eval": ("No evaluation yet.", "Todavía no hay evaluación."),
    "evaluate": ("Evaluate base vs fine-tuned", "Evaluar base frente a ajustado"),
    "topic": ("Topic", "Tema"),
    "base": ("base", "base"),
    "tuned": ("fine-tuned", "ajustado"),
    "change": ("change", "cambio"),
    "samples": ("Sample answers", "Respuestas de ejemplo"),
    "question": ("Question", "Pregunta"),
    "reference": ("Reference", "Referencia"),
    "correct": ("correct", "correcta"),
    "wrong": ("wrong", "incorrecta"),
    "report": ("Full report (report.html)", "Informe completo (report.html)"),
    "not_finished": ("This run has not finished: results, chat and export need its adapter.",
                     "Este entrenamiento no ha terminado: resultados, chat y exportación necesitan su adaptador."),
    "ask": ("Ask both models", "Preguntar a los dos modelos"),
    "your_question": ("Your question", "Tu pregunta"),
    "export_what": ("What to write", "Qué escribir"),
    "ex_gguf-f16": ("GGUF f16 (LM Studio, llama.cpp)", "GGUF f16 (LM Studio, llama.cpp)"),
    "ex_gguf-q8_0": ("GGUF q8_0 (smaller)", "GGUF q8_0 (más pequeño)"),
    "ex_lmstudio-f16": ("GGUF f16 straight into LM Studio's models folder",
                        "GGUF f16 directamente en la carpeta de modelos de LM Studio"),
    "ex_ollama-f16": ("GGUF f16 and a Modelfile for Ollama (ollama create)",
                      "GGUF f16 y un Modelfile para Ollama (ollama create)"),
    "ex_gguf-lora": ("LoRA adapter as GGUF (llama.cpp --lora)", "Adaptador LoRA en GGUF (llama.cpp --lora)"),
    "ex_hf": ("Merged safetensors folder (Transformers, vLLM)", "Carpeta safetensors fusionada (Transformers, vLLM)"),
    "exported": ("Exported files", "Archivos exportados"),
    "check_gguf": ("Then score the GGUF through llama.cpp against the PyTorch model (held-out problems)",
                   "Después, puntuar el GGUF con llama.cpp frente al modelo de PyTorch (problemas reservados)"),
    "checked": ("Checked with llama.cpp", "Comprobado con llama.cpp"),
    "file": ("File", "Archivo"),
    "identical": ("identical answers", "respuestas idénticas"),
    "checked_note": ("Accuracy with its 95% interval on the run's held-out problems, the same prompts and greedy "
                     "decoding; p: McNemar's exact test, GGUF vs PyTorch (mathtune eval RUN --gguf FILE).",
                     "Acierto con su intervalo del 95 % en los problemas reservados, con los mismos prompts y "
                     "decodificación voraz; p: prueba exacta de McNemar, GGUF frente a PyTorch "
                     "(mathtune eval RUN --gguf ARCHIVO)."),
    "job_running": ("working… {s} s", "trabajando… {s} s"),
    "job_done": ("done in {s} s", "hecho en {s} s"),
    "job_failed": ("failed", "falló"),
    "language": ("Español", "English"),
}


def pick_language(cookie: str | None, accept_language: str | None) -> str:
    if cookie in LANGUAGES:
        return cookie
    for part in (accept_language or "").split(","):
        code = part.split(";")[0].strip().lower()[:2]
        if code in LANGUAGES:
            return code
    return "en"


def translator(lang: str):
    index = LANGUAGES.index(lang) if lang in LANGUAGES else 0

    def t(key: str, **values) -> str:
        text = STRINGS[key][index]
        return text.format(**values) if values else text

    return t
