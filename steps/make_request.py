"""Turn image files into the JSON body a served model takes: `python -m steps.make_request a.jpg b.png > request.json`.

Then: curl -H 'Content-Type: application/json' --data @request.json http://127.0.0.1:5001/invocations
"""

import click

from pipeline.track.serving import read_images, request_json
from steps._cli import handle_errors


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--size",
    type=int,
    default=0,
    show_default=True,
    help="pixels; resize every image to size x size (0 = the first image's size; the model resizes to its own size "
         "anyway)",
)
@handle_errors(tracking=False)
def main(images, size):
    click.echo(request_json(read_images(list(images), size)))


if __name__ == "__main__":
    main()
